-- Faces by detector score, bucketed
WITH face AS (
    SELECT unnest(faces) AS f FROM metadata
),
bucket(ord, bucket, lo, hi) AS (
    VALUES (1, '<0.5', NULL, 0.5), (2, '0.5-0.7', 0.5, 0.7), (3, '0.7-0.8', 0.7, 0.8),
           (4, '0.8-0.9', 0.8, 0.9), (5, '0.9-0.95', 0.9, 0.95), (6, '0.95+', 0.95, NULL)
)
-- Left join from the bucket list so that empty buckets still show, with 0.
SELECT
    b.bucket AS score,
    count(face.f) AS faces,
    round(100.0 * count(face.f) / nullif(sum(count(face.f)) OVER (), 0), 2) AS pct
FROM bucket b
LEFT JOIN face ON (b.lo IS NULL OR face.f.score >= b.lo) AND (b.hi IS NULL OR face.f.score < b.hi)
GROUP BY b.ord, b.bucket
ORDER BY b.ord;
