"""Built-in backbones (installed as ``cstoolkit.backbones``). Each module registers its backbone."""
