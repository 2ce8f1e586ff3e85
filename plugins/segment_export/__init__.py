"""segment-export: an Apache Airflow provider that exports customer segments to Klaviyo and Mailchimp.

Words used everywhere in this package:

- **export**: one configured destination for one or more segments; one export is one DAG.
- **segment**: a named set of customers (rows of the segment table whose segment column holds that name).
- **profile**: one customer as the destination will hold it (email plus mapped attributes).
- **batch**: the profiles that go out in one request (a Klaviyo job, a Mailchimp batch-subscribe call).
- **destination**: a Klaviyo list or a Mailchimp audience.

The pure core (``spec``, ``mapping``, ``batching``, ``limit``, ``summary`` and the payload builders) does no I/O;
hooks own HTTP; operators wire the two.
"""

__version__ = "0.1.0"
