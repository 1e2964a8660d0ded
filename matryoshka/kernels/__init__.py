"""Triton kernels and their host functions.

Imported lazily by ``matryoshka.loss`` the first time the ``"triton"`` backend runs, so that the
package imports without Triton and so that ``TRITON_INTERPRET=1`` set by a test suite or a CPU user
before that first call still takes effect.
"""
