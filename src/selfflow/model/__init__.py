"""The model: the network (plain and the lean inference twin), its checkpoint files, its card
(class names and VAE) and the VAE it decodes with. It knows nothing of samplers or ranks."""
