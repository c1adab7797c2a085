"""Keeping the README true: its checked code blocks, and the blocks generated from the code."""
