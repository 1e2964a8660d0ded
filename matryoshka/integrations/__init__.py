"""Optional integrations with SAE training libraries.

Each submodule imports its library on import and is installed with the matching extra, e.g.
``matryoshka.integrations.sae_lens`` with ``pip install matryoshka-loss[sae-lens]``.  Importing
``matryoshka`` itself never imports any of them.
"""
