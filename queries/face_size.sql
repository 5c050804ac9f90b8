-- Faces by shorter side of their box in original-image pixels, bucketed
WITH face AS (
    SELECT unnest(faces) AS f FROM metadata
),
side AS (
    -- box is [x1, y1, x2, y2]; DuckDB lists are 1-based
    SELECT least(f.box[3] - f.box[1], f.box[4] - f.box[2]) AS px FROM face
),
bucket(ord, bucket, lo, hi) AS (
    VALUES (1, '<32', NULL, 32), (2, '32-63', 32, 64), (3, '64-127', 64, 128),
           (4, '128-255', 128, 256), (5, '256+', 256, NULL)
)
-- Left join from the bucket list so that empty buckets still show, with 0.
SELECT
    b.bucket AS shorter_side_px,
    count(s.px) AS faces,
    round(100.0 * count(s.px) / nullif(sum(count(s.px)) OVER (), 0), 2) AS pct
FROM bucket b
LEFT JOIN side s ON (b.lo IS NULL OR s.px >= b.lo) AND (b.hi IS NULL OR s.px < b.hi)
GROUP BY b.ord, b.bucket
ORDER BY b.ord;
