"""fasttrain: ETMAE (knowledge-distilled tiny masked autoencoders) for chest X-rays, trained fast."""
__version__ = "0.1.0"
