"""Models: ViT encoder, MAE, distillation wrapper, classifier, checkpoint I/O."""
