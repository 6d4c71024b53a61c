"""Unconfused engine: the ComfyUI-free core.

Nothing in this package imports ComfyUI. ComfyUI services (progress, cancel, device,
model folders, browser messages) are reached through `host`, which falls back to plain
Python when ComfyUI is absent.
"""
