"""Teachers: input building, pointwise and pairwise scoring, pair selection, training lines."""
