"""cfgen: language-guided Stable Diffusion counterfactuals of chest X-rays at dataset scale, on Ray.

Folders by concern, dependencies pointing one way: `io` and `phantoms` know nothing of models; `models`, `editing`
and `metrics` know nothing of Ray; `pipeline`, `train` and `tracking` put the pieces on Ray and MLflow.
"""

__version__ = "0.1.0"
