"""``python -m conf``: print the README's "Config keys" table, generated from ``conf/schema.py``."""

from conf.schema import markdown_table

print(markdown_table(), end="")
