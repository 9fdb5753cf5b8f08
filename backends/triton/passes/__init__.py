"""Triton-only graph rewrites, run after cache insertion when the triton backend is chosen."""
