"""Notebook support: the papermill runner and its profiles, plotting helpers."""
