"""Discovery: statistics that find hidden and spurious image-attribute relationships in counterfactual pairs."""
