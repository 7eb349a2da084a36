//! One span per hop, exported over OTLP/HTTP JSON (`OTEL_EXPORTER_OTLP_ENDPOINT`).
