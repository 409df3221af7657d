"""From spaces to maps: costs and blocks, assignment and OT solves, Procrustes, group maps, layouts, depth matching, activation statistics."""
