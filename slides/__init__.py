"""Whole-slide analysis: read a slide level by level, find tissue, classify tiles, map the answers."""
