"""The commands of the ``fxfuse`` command line, one module each (``fxfuse.commands.cli`` builds the parser from them).

    explain_command   fxfuse explain MODEL
    permute_command   fxfuse permute MODEL -o DIR
    compile_command   fxfuse compile MODEL... -o DIR   (or one recipe file)
    barrier_command   fxfuse barrier A B --data FILE
    rules_command     fxfuse rules check FILE... | fxfuse rules list
    shared            progress, warnings, common flags and checks

Each has ``add_parser(sub)``; the flags of the recipe options come from the
schema (``fxfuse.recipes.recipe.add_options``). They import torch only when they run.
"""
