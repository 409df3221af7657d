"""The typed options of a fusion (Recipe, YAML in and out) and the model card written from them."""
