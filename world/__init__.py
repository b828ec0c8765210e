"""The synthetic content/style world: generator, oracle classifiers, world bench (``cstoolkit world ...``).

A consumer of the core and the backbones like any method; see docs/world.md.
"""
