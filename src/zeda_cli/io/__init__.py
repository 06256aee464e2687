"""Bytes, not models: model sources (folder or Hub id), safetensors reading, streamed shard writing."""
