"""Reading finished runs: the report's tables, paired comparisons and plots, learning curves.
Imports store/ and the top level."""
