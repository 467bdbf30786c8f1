"""Taskbus shared contracts."""
