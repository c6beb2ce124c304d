"""IMDN without the service: `networks` (what a model is), `runtime` (how it runs),
`quality` (how it is scored), `training` (how it is trained). Nothing here imports
`service`."""
