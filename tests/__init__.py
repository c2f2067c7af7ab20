"""Tests for twisted-forward."""
