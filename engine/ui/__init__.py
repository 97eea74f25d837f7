"""The read-only web UI (`runbus ui`), the self-contained HTML report (`runbus report`) and the
notebook views, all rendered from the projection with the same templates and CSS."""
