"""``python -m strategies``: print the README's strategy x privacy table."""

from strategies import combination_table

print(combination_table())
