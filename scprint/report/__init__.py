"""Figures for `snakemake --report`: one module per report category (datasets, collection,
genes, training), each a `scprint report-<category>` subcommand that reads what the stages
wrote and writes PNG figures and HTML tables, so building the report recomputes nothing."""
