"""Cached text class vectors, teacher image features and faiss indexes."""
