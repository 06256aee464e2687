"""``zeda convert``: every stage in one resumable command (plan, memory estimates, stage runners)."""
