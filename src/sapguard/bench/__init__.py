"""The steering benchmark: judges, attacks, MMLU-format utility, KL and the runner behind `sap bench`."""
