"""Adapters that plug cuflash into other libraries. Each submodule imports its library; this package itself
imports nothing.

- :mod:`cuflash.integrations.transformers`: cuflash as a Hugging Face transformers attention implementation.
"""
