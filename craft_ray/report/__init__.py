"""Reports: the demo's HTML report and the result tables and plots."""
