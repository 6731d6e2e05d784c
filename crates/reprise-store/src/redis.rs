pub struct RedisStore;
