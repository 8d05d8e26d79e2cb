"""Quantization toolkit and shared, torch-free dataset helpers for the reference models."""
