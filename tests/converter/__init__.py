"""Tests of converter."""
