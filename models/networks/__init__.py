"""The networks and the facts about them: IMDN and IMDN_AS (`imdn`), their forward on
padded crops (`masked`), the official checkpoints and their registry
(`checkpoints`), one descriptor per model (`descriptor`), and depth and multiply-adds (`profile`).

What a model *is*; how it is run lives in `models.runtime`, how it is scored in
`models.quality`, how it is trained in `models.training`.
"""
