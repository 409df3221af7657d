"""The public entry points: compile (fuse), permute, barrier."""
