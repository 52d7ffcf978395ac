"""The synthetic world: shapes, rendered numbers and words, beeps, spoken words and short videos, with the
questions and answers about them that train and evaluate the embedded model. Imports nothing of ours."""
