"""`python -m spectraqlora.report <dir>`: the table, paired comparisons and plots of a multirun or
sweep dir (analysis/report.py)."""
import sys

from spectraqlora.analysis.report import main

if __name__ == "__main__":
    main(sys.argv[1:])
