"""The Dagster layer of particleSeg: thin assets, resources, sensors and jobs."""
