"""From maps to weights: emission of the aligned and fused states, out-of-core emission, repair, learned refinement, quality stages."""
