-- Example selection: samples with exactly one face of shorter side >= 96 px and score >= 0.95 (`python -m pipeline.subset`)
WITH sample AS (
    SELECT
        key,
        shard,
        -- box is [x1, y1, x2, y2] in original pixels; DuckDB lists are 1-based
        list_filter(faces, lambda f: f.score >= 0.95
                                     AND least(f.box[3] - f.box[1], f.box[4] - f.box[2]) >= 96) AS good
    FROM metadata
)
SELECT key, shard, good[1] AS face
FROM sample
WHERE len(good) = 1
ORDER BY key;
