"""Rows and batches: dataset sources, chat templates, tokenization and checks, the collators
(padded, padding-free, grouped) with attention per row, class-name scoring. Imports the top level."""
