"""Tests of extractor."""
