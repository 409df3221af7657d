"""What every stage builds on: errors, axis expressions and stores, derived-tensor caches, progress, the solvers and the map types, devices, path guards, input checks, the rule schema."""
