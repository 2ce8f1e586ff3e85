"""segment-export: an Apache Airflow provider that exports customer segments to marketing platforms
(Klaviyo, Mailchimp).

Words used everywhere in this package (the README's "Words" has them whole): **export** (one YAML entry, one
DAG), **destination** (a service written to, one package under ``destinations/``), **target** (what one export
writes to there: a list, an audience), **segment**, **profile**, **plan** (what a run will do), **batch** (the
profiles of one request) and **job** (a batch the destination finishes later; its handle is kept until then).

The pure core (``spec``, ``mapping``, ``batching``, ``limit``, ``summary`` and the payload builders) does no I/O;
hooks own HTTP; operators wire the two.
"""

__version__ = "0.1.0"
