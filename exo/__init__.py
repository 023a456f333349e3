"""exo: one cluster from the machines you already own."""
