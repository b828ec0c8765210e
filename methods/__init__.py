"""Built-in methods (installed as ``cstoolkit.methods``). Each module registers one or more methods."""
