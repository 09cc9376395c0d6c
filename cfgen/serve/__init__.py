"""Ray Serve: counterfactuals over HTTP (`deployment`), on the batch job's engine (`editor`), with limits (`inputs`),
a versioned API and a web page (`app`, `page`)."""
