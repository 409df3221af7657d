"""From a model to its spaces: tracing, canonicalisation, op kinds and symmetry groups, the rules, the permutation spaces, coverage, output checks, the space graph and its rendering."""
