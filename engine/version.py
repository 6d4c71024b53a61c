"""The pack's version, in a module that imports nothing: the trainers write it into their
files' metadata, and importing the engine must never import the node modules."""

__version__ = "0.1.0"
