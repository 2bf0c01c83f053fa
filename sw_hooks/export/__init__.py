"""Handing super weights to the tools that ship models."""
